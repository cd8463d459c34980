#!/usr/bin/env python3
"""Time per metadata operation of the kv engine on etcd (and on MemKV, for KvMeta's own cost).

Starts its own 3-member etcd cluster on loopback ports (tests/etcdproc.py, the
tests' cluster; data directories under --dir, never a tmpfs by default) and
stops it by PID at the end, also after a failure or Ctrl-C.  For each engine
it times, one call after another from one thread: mknod, lookup, getattr and
commit (one extent into a fresh file, with its block's refcount), and the raw
KV calls under them (get, one-put commit); then mknod from --threads threads
at once (calls per second), all in one directory and each in its own.  Prints
one line per operation: median and mean in milliseconds.

    python3 tools/etcdbench.py [--ops 300] [--threads 8] [--dir /var/tmp]

Standard library and hafs (this checkout's) only.  Don't run it next to other heavy work: three
etcd members and the client share the machine's CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's hafs, and the tests' cluster

from etcdproc import etcd_binary, running_cluster  # noqa: E402

from hafs.meta import ROOT_INODE, Extent, FsConfig  # noqa: E402
from hafs.meta.etcd import create_etcd  # noqa: E402
from hafs.meta.kv import KvMeta  # noqa: E402
from hafs.meta.memkv import MemKV  # noqa: E402

CONFIG = FsConfig("bench", 2, 1, "tok", 0)
RING = {"version": 1, "nodes": []}
REG = 0o100644


def timed(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def bench(label: str, m: KvMeta, n: int, threads: int) -> None:
    d = m.mknod(ROOT_INODE, b"d", 0o40755, 0, 0).id
    inos: list[int] = []
    rows = {
        "mknod": timed(lambda i: inos.append(m.mknod(d, b"f%06d" % i, REG, 0, 0).id), n),
        "lookup": timed(lambda i: m.lookup(d, b"f%06d" % i), n),
        "getattr": timed(lambda i: m.getattr(inos[i]), n),
        "commit": timed(
            lambda i: m.commit(
                inos[i], 0, 4096, [Extent(0, 4096, f"b{i:06}")], {f"b{i:06}": 4096}, 4096, i + 1
            ),
            n,
        ),  # fmt: skip
        "kv.get": timed(lambda i: m.kv.get(b"Mconfig"), n),
        "kv.commit": timed(lambda i: m.kv.commit({}, {b"bench%06d" % i: b"x"}, ()), n),
    }
    for op, times in rows.items():
        ms = [t * 1000 for t in times]
        print(f"{label:6} {op:10} median {statistics.median(ms):6.2f} ms"
              f"  mean {statistics.mean(ms):6.2f} ms  ({n} calls)")  # fmt: skip

    for shared in (True, False):  # all threads in one directory, or each in its own
        dirs = [d if shared else m.mknod(d, b"t%02d" % k, 0o40755, 0, 0).id for k in range(threads)]

        def worker(k: int, dirs: list[int] = dirs) -> None:
            for i in range(n // threads):
                m.mknod(dirs[k], b"t%02d-%06d" % (k, i), REG, 0, 0)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        rate = (n // threads) * threads / (time.perf_counter() - t)
        where = "one directory" if shared else "a directory each"
        print(f"{label:6} {'mknod':10} {rate:7.0f} calls/s from {threads} threads, {where}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=300, help="calls per operation (default 300)")
    ap.add_argument("--threads", type=int, default=8, help="threads for the mknod burst")
    ap.add_argument("--dir", default="/var/tmp", help="where the etcd data directories go")
    args = ap.parse_args()
    if etcd_binary() is None:
        print("etcdbench: etcd is not installed (apt-get install etcd-server)", file=sys.stderr)
        return 2
    bench("memkv", KvMeta.create(MemKV(), CONFIG, RING, 0, 0), args.ops, args.threads)
    with tempfile.TemporaryDirectory(prefix="hafs-etcdbench-", dir=args.dir) as base:
        with running_cluster(Path(base)) as cluster:
            m = create_etcd(cluster.url("bench"), CONFIG, RING, 0, 0)
            try:
                bench("etcd", m, args.ops, args.threads)
            finally:
                m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
