"""`hafs stats MOUNTPOINT`: a mount's metrics, live, once a second (like `juicefs stats`).

The mount serves its figures with `-o metrics=HOST:PORT` (hafs.metrics) and
writes the URL into HOME/run/; this tool scrapes it every interval and shows
rates over the last interval: on a terminal a screen redrawn in place (top),
otherwise one line per interval (vmstat), with a header first.  Ctrl-C ends
it (exit 0).  Single-threaded, blocking: a plain command-line loop.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections import defaultdict
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from ..errors import UserError

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]

COLUMNS = (  # (header, width)
    ("ops/s", 8),
    ("op_ms", 7),
    ("err/s", 6),
    ("rd_MB/s", 8),
    ("wr_MB/s", 8),
    ("hit%", 5),
    ("get/s", 7),
    ("put/s", 7),
    ("blk_ms", 7),
    ("blkerr", 6),
    ("up", 3),
    ("down", 4),
    ("degr", 5),
    ("locks", 5),
    ("lkw/s", 6),
    ("buf_MB", 7),
)


def scrape(url: str, timeout: float = 5.0) -> Sample:
    """Every sample at `url`: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def total(sample: Sample, name: str, **match: str) -> float:
    """The sum of `name`'s samples whose labels include `match`."""
    return sum(
        v
        for (n, labels), v in sample.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def by_label(sample: Sample, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in sample.items():
        if n == name:
            out[dict(labels).get(label, "")] += v
    return out


def figures(prev: Sample, cur: Sample, seconds: float) -> dict[str, float]:
    """The columns' values: rates over the interval between `prev` and `cur`, gauges now."""

    def rate(name: str, **match: str) -> float:
        return max(0.0, total(cur, name, **match) - total(prev, name, **match)) / seconds

    def mean_ms(base: str, **match: str) -> float:
        n = total(cur, base + "_count", **match) - total(prev, base + "_count", **match)
        s = total(cur, base + "_sum", **match) - total(prev, base + "_sum", **match)
        return 1000 * s / n if n > 0 else 0.0

    hits, misses = rate("hafs_block_cache_hits_total"), rate("hafs_block_cache_misses_total")
    return {
        "ops/s": rate("hafs_fuse_op_seconds_count"),
        "op_ms": mean_ms("hafs_fuse_op_seconds"),
        "err/s": rate("hafs_fuse_op_errors_total"),
        "rd_MB/s": rate("hafs_read_bytes_total") / 1e6,
        "wr_MB/s": rate("hafs_written_bytes_total") / 1e6,
        "hit%": 100 * hits / (hits + misses) if hits + misses else 0.0,
        "get/s": rate("hafs_block_call_seconds_count", call="get"),
        "put/s": rate("hafs_block_call_seconds_count", call="put"),
        "blk_ms": mean_ms("hafs_block_call_seconds"),
        "blkerr": rate("hafs_block_call_errors_total"),
        "up": total(cur, "hafs_nodes", state="up"),
        "down": total(cur, "hafs_nodes", state="down"),
        "degr": total(cur, "hafs_degraded_blocks"),
        "locks": total(cur, "hafs_write_locks_held"),
        "lkw/s": rate("hafs_write_lock_wait_seconds_count"),
        "buf_MB": total(cur, "hafs_write_buffer_bytes") / 1e6,
    }


def _cell(value: float, width: int) -> str:
    text = f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"
    return text.rjust(width)


def header() -> str:
    return " ".join(h.rjust(w) for h, w in COLUMNS)


def line(values: dict[str, float]) -> str:
    return " ".join(_cell(values[h], w) for h, w in COLUMNS)


def screen(mountpoint: str, prev: Sample, cur: Sample, seconds: float) -> str:
    """The terminal view: the line, then operations and nodes one per row."""
    rows = [f"hafs stats {mountpoint}  (every {seconds:.0f} s; Ctrl-C ends)", "", header()]
    rows.append(line(figures(prev, cur, seconds)))
    rows += ["", f"{'operation':<14}{'/s':>9}{'ms':>9}{'errors/s':>10}"]
    ops = by_label(cur, "hafs_fuse_op_seconds_count", "op")
    for op in sorted(
        ops, key=lambda o: -(ops[o] - total(prev, "hafs_fuse_op_seconds_count", op=o))
    ):
        f = figures(
            {k: v for k, v in prev.items() if ("op", op) in k[1]},
            {k: v for k, v in cur.items() if ("op", op) in k[1]},
            seconds,
        )
        rows.append(f"{op:<14}{f['ops/s']:>9.1f}{f['op_ms']:>9.2f}{f['err/s']:>10.1f}")
    rows += ["", f"{'node':<14}{'get/s':>9}{'put/s':>9}{'ms':>9}{'errors/s':>10}"]
    for node in sorted(by_label(cur, "hafs_block_call_seconds_count", "node")):

        def of(s: Sample, node: str = node) -> Sample:
            return {k: v for k, v in s.items() if ("node", node) in k[1]}

        f = figures(of(prev), of(cur), seconds)
        rows.append(
            f"{node:<14}{f['get/s']:>9.1f}{f['put/s']:>9.1f}{f['blk_ms']:>9.2f}{f['blkerr']:>10.1f}"
        )
    return "\n".join(rows)


def run(
    url: str,
    mountpoint: str,
    interval: float = 1.0,
    count: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Show the figures at `url` every `interval` seconds, `count` times (None: until Ctrl-C)."""
    tty = out.isatty()

    def fetch() -> Sample:
        try:
            return scrape(url)
        except OSError as e:
            raise UserError(
                f"cannot read the metrics of {mountpoint} at {url} ({e}): is it still mounted?"
            ) from None

    prev, at = fetch(), time.monotonic()
    if not tty:
        print(header(), file=out, flush=True)
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(max(0.0, at + interval - time.monotonic()))
            cur, now = fetch(), time.monotonic()
            if tty:
                out.write("\x1b[H\x1b[J" + screen(mountpoint, prev, cur, now - at) + "\n")
                out.flush()
            else:
                print(line(figures(prev, cur, now - at)), file=out, flush=True)
            prev, at = cur, now
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0
