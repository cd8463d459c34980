#!/usr/bin/env python3
"""Small files created by parallel writers: files/s for 1 and for N writer threads.

    python3 tools/parallel_smallfiles.py DIR [--writers 1,8] [--files 2000] [--size 4096]

Each writer thread creates and closes its share of --files files of --size
unique bytes (open, write, close: no fsync; hafs makes a close durable) in its
own directory under DIR/parsmall-<pid>, which is removed at the end.  One JSON
line per writer count: {"writers", "files", "seconds", "files_per_s", "load"}.
Plain standard library; meant for a mountpoint (hafs, or a plain directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time


def run(base: str, writers: int, files: int, size: int) -> dict:
    work = os.path.join(base, f"parsmall-{os.getpid()}-{writers}")
    dirs = [os.path.join(work, f"w{w}") for w in range(writers)]
    for d in dirs:
        os.makedirs(d)
    per = files // writers
    payloads = [[os.urandom(size) for _ in range(per)] for _ in range(writers)]
    start = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        start.wait()
        for i, data in enumerate(payloads[w]):
            with open(os.path.join(dirs[w], f"f{i}"), "wb") as f:
                f.write(data)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    shutil.rmtree(work)
    return {
        "writers": writers,
        "files": per * writers,
        "seconds": round(seconds, 3),
        "files_per_s": round(per * writers / seconds, 1),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--writers", default="1,8", help="comma-separated writer counts")
    ap.add_argument("--files", type=int, default=2000, help="files per run (all writers)")
    ap.add_argument("--size", type=int, default=4096, help="bytes per file")
    args = ap.parse_args()
    for n in (int(x) for x in args.writers.split(",")):
        print(json.dumps(run(args.dir, n, args.files, args.size)), flush=True)


if __name__ == "__main__":
    main()
