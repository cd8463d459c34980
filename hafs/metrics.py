"""MountMetrics: the Prometheus figures of one mount, in a registry of its own.

A mount makes one `MountMetrics` and passes it down (fuse_ops, vfs, file
states, block cache, placement); nothing here is module-level, so two mounts
(or two placements in one test) never share a figure.  With `-o
metrics=HOST:PORT` the mount serves the registry over HTTP (`serve`:
prometheus_client's server, in a daemon thread of its own, so a scrape never
blocks the trio loop).

Counting is on every FUSE operation and block call, so it is plain Python
(`Family`: numbers in dicts and lists, a lock per series), about a tenth of
the cost of prometheus_client's own metric objects there; the registry reads
them through a collector only when scraped.  Counters and histograms are
updated where things happen (the trio thread, and placement's worker threads
for block calls).  Gauges of state owned by the trio thread (write locks held,
write-buffer fill, nodes up and down, degraded blocks) are set by the mount's
`sample` round once a second from the trio thread; a scrape only reads them.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .errors import UserError

# seconds: from a cached getattr (tens of µs) to a block call waiting out a node timeout
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Series:
    """One series of a family (one set of label values): a value, or a histogram's
    bucket counts (the last one +Inf) and sum.  Thread-safe."""

    __slots__ = ("_lock", "value", "counts", "sum")

    def __init__(self, histogram: bool) -> None:
        self._lock = threading.Lock()
        self.value = 0.0
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1) if histogram else []
        self.sum = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.sum += seconds

    def snapshot(self) -> tuple[float, list[int], float]:
        with self._lock:
            return self.value, list(self.counts), self.sum


class Family:
    """A metric by name: a counter, gauge or (LATENCY_BUCKETS) histogram, with labels.

    `labels(*values)` is its series for those values (made once); a family without
    labels is used directly (`inc`, `set`, `observe`).
    """

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.kind, self.name, self.doc, self.label_names = kind, name, doc, labels
        self._series: dict[tuple[str, ...], Series] = {}
        self._make = threading.Lock()
        if not labels:
            self._plain = self.labels()
            self.inc, self.set, self.observe = (
                self._plain.inc,
                self._plain.set,
                self._plain.observe,
            )

    def labels(self, *values: str) -> Series:
        series = self._series.get(values)
        if series is None:
            with self._make:
                series = self._series.setdefault(values, Series(self.kind == "histogram"))
        return series

    def metric(self) -> Metric:
        """The family as prometheus_client exposes it, as of now."""
        names = list(self.label_names)
        if self.kind == "counter":
            m: Metric = CounterMetricFamily(self.name, self.doc, labels=names)
        elif self.kind == "gauge":
            m = GaugeMetricFamily(self.name, self.doc, labels=names)
        else:
            m = HistogramMetricFamily(self.name, self.doc, labels=names)
        for values, series in list(self._series.items()):
            value, counts, total = series.snapshot()
            if self.kind != "histogram":
                m.add_metric(list(values), value)
                continue
            cumulative, running = [], 0
            for le, n in zip((*LATENCY_BUCKETS, math.inf), counts):
                running += n
                cumulative.append(("+Inf" if le == math.inf else repr(le), running))
            m.add_metric(list(values), cumulative, total)
        return m


class MountMetrics:
    """The figures of one mount, exposed by `self.registry`."""

    def __init__(self) -> None:
        families = []

        def family(kind: str, name: str, doc: str, *labels: str) -> Family:
            families.append(Family(kind, name, doc, labels))
            return families[-1]

        self.op_seconds = family(
            "histogram",
            "hafs_fuse_op_seconds",
            "FUSE operations answered, by kind, and how long they took.",
            "op",
        )
        self.op_errors = family(
            "counter",
            "hafs_fuse_op_errors",
            "FUSE operations answered with an error, by kind.",
            "op",
        )
        self.read_bytes = family("counter", "hafs_read_bytes", "Bytes returned by read.")
        self.written_bytes = family("counter", "hafs_written_bytes", "Bytes taken by write.")
        self.cache_hits = family(
            "counter", "hafs_block_cache_hits", "Block reads answered by the block cache."
        )
        self.cache_misses = family(
            "counter",
            "hafs_block_cache_misses",
            "Block reads that fetched the block from the nodes.",
        )
        self.block_seconds = family(
            "histogram",
            "hafs_block_call_seconds",
            "Block calls (get, put, ...) to each node that ended, and how long they took.",
            "node",
            "call",
        )
        self.block_errors = family(
            "counter",
            "hafs_block_call_errors",
            "Block calls to each node that failed (a missing block is no error).",
            "node",
            "call",
        )
        self.meta_seconds = family(
            "histogram",
            "hafs_meta_request_seconds",
            "Requests to the metadata store (etcd round trips: get, scan, batch, commit,"
            " lease_*), by call, and how long they took; none with embedded metadata.",
            "call",
        )
        self.nodes = family(
            "gauge", "hafs_nodes", "Nodes of the ring, by state (up, down).", "state"
        )
        self.degraded_blocks = family(
            "gauge",
            "hafs_degraded_blocks",
            "Blocks recorded with fewer than R copies or off their ring nodes (awaiting repair).",
        )
        self.locks_held = family(
            "gauge", "hafs_write_locks_held", "Write locks (one per file being changed) held."
        )
        self.lock_wait_seconds = family(
            "histogram",
            "hafs_write_lock_wait_seconds",
            "Write locks taken, and how long taking each one waited.",
        )
        self.buffer_bytes = family(
            "gauge", "hafs_write_buffer_bytes", "Written bytes buffered, not yet stored."
        )
        self.buffer_limit = family(
            "gauge", "hafs_write_buffer_limit_bytes", "The write buffer's size (write_buffer_mb)."
        )
        self._families = families
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The registry's view (prometheus_client's collector protocol)."""
        for f in self._families:
            yield f.metric()

    def op(self, name: str) -> Series:
        """The latency histogram of FUSE operation `name`."""
        return self.op_seconds.labels(name)

    def block_call(self, node: str, call: str, seconds: float, failed: bool) -> None:
        """One block call to `node` ended (from any thread)."""
        self.block_seconds.labels(node, call).observe(seconds)
        if failed:
            self.block_errors.labels(node, call).inc()

    def meta_request(self, call: str, seconds: float) -> None:
        """One request to the metadata store ended (from any thread)."""
        self.meta_seconds.labels(call).observe(seconds)

    def serve(self, address: str) -> tuple[str, int]:
        """Serve the registry at http://HOST:PORT/metrics in a daemon thread; the bound
        (host, port).  UserError if the address is malformed or cannot be bound."""
        host, port = parse_address(address)
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UserError(
                f"mount option metrics={address}: cannot listen there ({e.strerror or e}):"
                " choose another port"
            ) from None
        self._server = server
        return server.server_address[0], server.server_address[1]

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or PORT alone (on 127.0.0.1) -> (host, port); UserError."""
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", address
    host = host.strip("[]")
    try:
        if not host or not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise UserError(
            f"mount option metrics={address!r}: expected HOST:PORT, e.g. metrics=127.0.0.1:9567"
        ) from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
