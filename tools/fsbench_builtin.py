#!/usr/bin/env python3
"""The built-in yardstick of tools/bench.py: simple filesystem workloads on one directory.

    python3 tools/fsbench_builtin.py DIR LABEL [--quick] [--reps N] [--only a,b,...]
                                     [--unique-data]

Standard library only, so that bench.py runs from a bare clone.  It takes the
arguments bench.py gives any yardstick and prints the same JSON lines: one
"meta" line (fstype, mountpoint, drop_caches, ...), one line per workload or
phase with "median_s", "samples_s", "rate" and "unit" (the rate of the median
repetition), and a "done" line.  It works in DIR/fsbench-<pid> and removes it.

Workloads (--only names; sizes full / --quick):
  seqwrite    one file of 1024 / 96 MiB in 1 MiB write()s, then fsync (MiB/s);
              data: every MiB unique with --unique-data, else a 64 / 16 MiB
              random buffer repeated
  seqread     that file read back in 1 MiB reads, kernel caches dropped first
              (when permitted: root), MiB/s
  cp          `cp` of that file inside DIR, then fsync of the copy (MiB/s;
              cp_only_s without the fsync)
  smallfiles  5000 / 500 files of 4 KiB in 50 / 10 directories: create, stat,
              read, delete, each phase timed on its own (ops/s)
  tree        a tarball of this Python's standard library (every 10th file with
              --quick), made once outside DIR: `tar -xf` into DIR, `diff -r`
              against an extraction outside DIR, `rm -rf` (files/s)
  randwrite   4 threads, each random 4 KiB pwrite()s into its own pre-filled
              64 / 8 MiB file for 5 / 2 s (IOPS; iops_incl_fsync counts the
              final fsync of the four files)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time

MiB = 1024 * 1024
KiB = 1024
ALL = ["seqwrite", "seqread", "cp", "smallfiles", "tree", "randwrite"]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def drop_caches() -> bool:
    """sync, then drop the kernel's page, dentry and inode caches; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def mount_of(path: str) -> tuple[str, str, str, str]:
    """(mountpoint, fstype, device, options) of the filesystem holding `path`."""
    path = os.path.realpath(path)
    best = ("", "?", "?", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev, opts)
    return best


def record(cfg, workload: str, samples: list[float], amount: float, unit: str, **extra) -> dict:
    median = statistics.median(samples)
    return {
        "label": cfg.label,
        "workload": workload,
        "median_s": round(median, 4),
        "samples_s": [round(s, 4) for s in samples],
        "rate": round(amount / median, 2) if median > 0 else None,
        "unit": unit,
        **extra,
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------ one big file: (a)-(c)


def chunks(cfg) -> list[memoryview]:
    """The 1 MiB pieces of the big file: all unique, or one random buffer repeated."""
    if cfg.unique_data:
        buf = memoryview(os.urandom(cfg.file_mib * MiB))
        return [buf[i * MiB : (i + 1) * MiB] for i in range(cfg.file_mib)]
    buf = memoryview(os.urandom(cfg.buf_mib * MiB))
    return [buf[i * MiB : (i + 1) * MiB] for i in range(cfg.buf_mib)] * (
        cfg.file_mib // cfg.buf_mib
    )


def seqwrite(cfg, path: str, reps: int) -> dict:
    samples = []
    for _ in range(reps):
        data = chunks(cfg)  # fresh random data every repetition: no dedup across them
        drop_caches()

        def write():
            with open(path, "wb") as f:  # buffered: each 1 MiB piece is written whole
                for piece in data:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())

        samples.append(timed(write))
    kind = "unique" if cfg.unique_data else f"{cfg.buf_mib} MiB urandom buffer repeated"
    return record(cfg, "seqwrite", samples, cfg.file_mib, "MiB/s", size_mib=cfg.file_mib, data=kind)


def seqread(cfg, path: str) -> dict:
    samples, dropped, buf = [], [], bytearray(MiB)
    for _ in range(cfg.reps):
        dropped.append(drop_caches())
        total = 0

        def read():
            nonlocal total
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n

        samples.append(timed(read))
        if total != cfg.file_mib * MiB:
            raise RuntimeError(f"read {total} bytes of {path}, expected {cfg.file_mib * MiB}")
    return record(
        cfg, "seqread", samples, cfg.file_mib, "MiB/s", size_mib=cfg.file_mib,
        drop_caches=all(dropped),
    )  # fmt: skip


def cp(cfg, path: str) -> dict:
    copy = path + ".copy"
    samples, cp_only, dropped = [], [], []
    for _ in range(cfg.reps):
        if os.path.exists(copy):
            os.unlink(copy)
        dropped.append(drop_caches())
        t0 = time.perf_counter()
        run(["cp", path, copy])
        t1 = time.perf_counter()
        fsync_path(copy)
        samples.append(time.perf_counter() - t0)
        cp_only.append(t1 - t0)
        if os.path.getsize(copy) != os.path.getsize(path):
            raise RuntimeError("cp made a copy of another size")
    os.unlink(copy)
    return record(
        cfg, "cp", samples, cfg.file_mib, "MiB/s", size_mib=cfg.file_mib,
        cp_only_s=round(statistics.median(cp_only), 4), drop_caches=all(dropped),
    )  # fmt: skip


# ----------------------------------------------------------- small files: (d)


def smallfiles(cfg, work: str) -> list[dict]:
    per_dir = cfg.small_files // cfg.small_dirs
    payload = os.urandom(4 * KiB)
    phases: dict[str, list[float]] = {"create": [], "stat": [], "read": [], "delete": []}
    dropped = []
    for rep in range(cfg.reps):
        root = os.path.join(work, f"small{rep}")
        dirs = [os.path.join(root, f"d{d:03}") for d in range(cfg.small_dirs)]
        names = [os.path.join(d, f"f{i:05}") for d in dirs for i in range(per_dir)]

        def create():
            os.mkdir(root)
            for d in dirs:
                os.mkdir(d)
            for p in names:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, payload)
                os.close(fd)

        def stat():
            if any(os.stat(p).st_size != len(payload) for p in names):
                raise RuntimeError("a small file has the wrong size")

        def read():
            for p in names:
                with open(p, "rb", buffering=0) as f:
                    if f.read(8 * KiB) != payload:
                        raise RuntimeError(f"{p} reads back wrong")

        def delete():
            for p in names:
                os.unlink(p)
            for d in dirs:
                os.rmdir(d)
            os.rmdir(root)

        for phase, fn in (("create", create), ("stat", stat), ("read", read), ("delete", delete)):
            if phase in ("stat", "read"):
                dropped.append(drop_caches())
            else:
                drop_caches()
            phases[phase].append(timed(fn))
    files = per_dir * cfg.small_dirs
    return [
        record(
            cfg, f"smallfiles_{phase}", samples, files, "ops/s", files=files,
            dirs=cfg.small_dirs, file_size=len(payload), drop_caches=all(dropped),
        )  # fmt: skip
        for phase, samples in phases.items()
    ]


# ------------------------------------------------------------ a source tree: (e)


def make_tarball(cfg, scratch: str) -> tuple[str, str, int, int]:
    """A tarball of the standard library (outside DIR) and a reference extraction of it:
    (tarball, reference tree, files, bytes)."""
    src = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [os.path.join(dirpath, f) for f in sorted(filenames)]
    if cfg.quick:
        files = files[::10]
    tar_path = os.path.join(scratch, "tree.tar")
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in files:
            tar.add(p, arcname=os.path.join("src", os.path.relpath(p, src)), recursive=False)
    ref = os.path.join(scratch, "ref")
    os.mkdir(ref)
    run(["tar", "-xf", tar_path, "-C", ref])
    ref = os.path.join(ref, "src")
    sizes = [os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(ref) for f in fs]
    return tar_path, ref, len(sizes), sum(sizes)


def tree(cfg, work: str) -> list[dict]:
    phases: dict[str, list[float]] = {"untar": [], "diff": [], "rmrf": []}
    with tempfile.TemporaryDirectory(prefix="fsbench-tree-") as scratch:
        tar_path, ref, n_files, size = make_tarball(cfg, scratch)
        for rep in range(cfg.reps):
            dest = os.path.join(work, f"tree{rep}")
            os.mkdir(dest)
            drop_caches()
            with open(tar_path, "rb") as f:  # the tarball in the page cache: not timed
                while f.read(8 * MiB):
                    pass
            for phase, argv in (
                ("untar", ["tar", "-xf", tar_path, "-C", dest]),
                ("diff", ["diff", "-r", ref, os.path.join(dest, "src")]),  # fails on a difference
                ("rmrf", ["rm", "-rf", dest]),
            ):
                phases[phase].append(timed(functools.partial(run, argv)))
    return [
        record(
            cfg, f"tree_{phase}", samples, n_files, "files/s", files=n_files,
            mib=round(size / MiB, 1),
        )  # fmt: skip
        for phase, samples in phases.items()
    ]


# ------------------------------------------------------- random 4 KiB writes: (f)


def _random_writes(fd: int, seed: int, cfg, payloads: list[bytes], start, result: list) -> None:
    """One randwrite thread: 4 KiB pwrite()s at random aligned offsets of `fd` for
    cfg.rw_seconds after `start` (a Barrier); appends its count (or its error) to `result`."""
    rnd, n, blocks = random.Random(seed), 0, cfg.rw_file_mib * MiB // (4 * KiB)
    try:
        start.wait()
        deadline = time.perf_counter() + cfg.rw_seconds
        while time.perf_counter() < deadline:
            for _ in range(16):  # the clock every 16 writes: little overhead
                os.pwrite(fd, payloads[n & 255], rnd.randrange(blocks) * 4 * KiB)
                n += 1
    except OSError as e:
        result.append(e)
        return
    result.append(n)


def randwrite(cfg, work: str) -> dict:
    paths = [os.path.join(work, f"rand{t}.bin") for t in range(cfg.rw_threads)]
    for p in paths:  # pre-filled with random data, not timed
        with open(p, "wb") as f:
            for _ in range(cfg.rw_file_mib):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
    payloads = [os.urandom(4 * KiB) for _ in range(256)]  # so dedup cannot fold the writes
    samples, iops, iops_sync, fsync_s, writes = [], [], [], [], 0
    for rep in range(cfg.reps):
        drop_caches()
        fds = [os.open(p, os.O_WRONLY) for p in paths]
        counts: list = []
        start = threading.Barrier(len(fds) + 1)
        threads = [
            threading.Thread(
                target=_random_writes, args=(fd, 1000 * rep + i, cfg, payloads, start, counts)
            )
            for i, fd in enumerate(fds)
        ]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        t1 = time.perf_counter()
        for fd in fds:
            os.fsync(fd)
            os.close(fd)
        t2 = time.perf_counter()
        errors = [c for c in counts if isinstance(c, OSError)]
        if errors:
            raise RuntimeError(f"a randwrite thread failed: {errors[0]!r}")
        samples.append(t1 - t0)
        fsync_s.append(t2 - t1)
        writes += sum(counts)
        iops.append(sum(counts) / (t1 - t0))
        iops_sync.append(sum(counts) / (t2 - t0))
    for p in paths:
        os.unlink(p)
    return {
        "label": cfg.label,
        "workload": "randwrite",
        "median_s": round(statistics.median(samples), 4),
        "samples_s": [round(s, 4) for s in samples],
        "rate": round(statistics.median(iops), 1),
        "unit": "IOPS",
        "iops_incl_fsync": round(statistics.median(iops_sync), 1),
        "fsync_median_s": round(statistics.median(fsync_s), 4),
        "threads": cfg.rw_threads,
        "file_mib": cfg.rw_file_mib,
        "seconds": cfg.rw_seconds,
        "writes": writes,  # pwrite()s of all repetitions
    }


# -------------------------------------------------------------------- main


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description="hafs' built-in filesystem yardstick (docstring).")
    ap.add_argument("dir", help="a directory on the filesystem under test")
    ap.add_argument("label", help="copied into every result line")
    ap.add_argument("--quick", action="store_true", help="sizes about 10x smaller")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    ap.add_argument("--only", default=",".join(ALL), help="a subset of: " + ",".join(ALL))
    ap.add_argument("--unique-data", action="store_true", help="seqwrite: every MiB unique")
    cfg = ap.parse_args(argv)
    cfg.only = [w.strip() for w in cfg.only.split(",") if w.strip()]
    unknown = [w for w in cfg.only if w not in ALL]
    if unknown or cfg.reps < 1:
        ap.error(f"unknown workload(s) {unknown}" if unknown else "--reps must be at least 1")
    if cfg.quick:
        cfg.buf_mib, cfg.file_mib, cfg.small_files, cfg.small_dirs = 16, 96, 500, 10
        cfg.rw_file_mib, cfg.rw_seconds = 8, 2.0
    else:
        cfg.buf_mib, cfg.file_mib, cfg.small_files, cfg.small_dirs = 64, 1024, 5000, 50
        cfg.rw_file_mib, cfg.rw_seconds = 64, 5.0
    cfg.rw_threads = 4
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    target = os.path.abspath(cfg.dir)
    if not os.path.isdir(target):
        sys.exit(f"not a directory: {target}")
    mnt, fstype, dev, opts = mount_of(target)
    emit(
        {"label": cfg.label, "workload": "meta", "dir": target, "mountpoint": mnt,
         "fstype": fstype, "device": dev, "mount_options": opts, "quick": cfg.quick,
         "reps": cfg.reps, "workloads": cfg.only, "unique_data": cfg.unique_data,
         "yardstick": "builtin", "drop_caches": drop_caches()}
    )  # fmt: skip
    work = os.path.join(target, f"fsbench-{os.getpid()}")
    os.mkdir(work)
    t_all = time.perf_counter()
    try:
        big = os.path.join(work, "big.bin")
        if {"seqwrite", "seqread", "cp"} & set(cfg.only):  # seqread and cp need the file
            rec = seqwrite(cfg, big, cfg.reps if "seqwrite" in cfg.only else 1)
            if "seqwrite" in cfg.only:
                emit(rec)
            if "seqread" in cfg.only:
                emit(seqread(cfg, big))
            if "cp" in cfg.only:
                emit(cp(cfg, big))
            os.unlink(big)
        if "smallfiles" in cfg.only:
            for rec in smallfiles(cfg, work):
                emit(rec)
        if "tree" in cfg.only:
            for rec in tree(cfg, work):
                emit(rec)
        if "randwrite" in cfg.only:
            emit(randwrite(cfg, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({"label": cfg.label, "workload": "done", "total_s": round(time.perf_counter() - t_all, 1)})


if __name__ == "__main__":
    main()
