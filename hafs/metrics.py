"""MountMetrics: the Prometheus figures of one mount, in a registry of its own.

A mount makes one `MountMetrics` and passes it down (fuse_ops, vfs, file
states, block cache, placement); nothing here is module-level, so two mounts
(or two placements in one test) never share a figure.  With `-o
metrics=HOST:PORT` the mount serves the registry over HTTP (`serve`:
prometheus_client's server, in a daemon thread of its own, so a scrape never
blocks the trio loop).

Concurrency: prometheus_client's metric objects are thread-safe; counters and
histograms are updated where things happen (the trio thread, and placement's
worker threads for block calls).  Gauges of state owned by the trio thread
(write locks held, write-buffer fill, nodes up and down, degraded blocks) are
set by the mount's `sample` round once a second from the trio thread; a scrape
only reads them.
"""

from __future__ import annotations

import ipaddress
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import UserError

# seconds: from a cached getattr (tens of µs) to a block call waiting out a node timeout
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class MountMetrics:
    """The metric objects of one mount, registered in `self.registry`."""

    def __init__(self) -> None:
        self._op: dict[str, object] = {}  # op name -> its histogram child (labels() costs)
        r = self.registry = CollectorRegistry()
        self.op_seconds = Histogram(
            "hafs_fuse_op_seconds",
            "FUSE operations answered, by kind, and how long they took.",
            ["op"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.op_errors = Counter(
            "hafs_fuse_op_errors",
            "FUSE operations answered with an error, by kind.",
            ["op"],
            registry=r,
        )
        self.read_bytes = Counter("hafs_read_bytes", "Bytes returned by read.", registry=r)
        self.written_bytes = Counter("hafs_written_bytes", "Bytes taken by write.", registry=r)
        self.cache_hits = Counter(
            "hafs_block_cache_hits", "Block reads answered by the block cache.", registry=r
        )
        self.cache_misses = Counter(
            "hafs_block_cache_misses",
            "Block reads that fetched the block from the nodes.",
            registry=r,
        )
        self.block_seconds = Histogram(
            "hafs_block_call_seconds",
            "Block calls (get, put, ...) to each node that ended, and how long they took.",
            ["node", "call"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.block_errors = Counter(
            "hafs_block_call_errors",
            "Block calls to each node that failed (a missing block is no error).",
            ["node", "call"],
            registry=r,
        )
        self.nodes = Gauge(
            "hafs_nodes", "Nodes of the ring, by state (up, down).", ["state"], registry=r
        )
        self.degraded_blocks = Gauge(
            "hafs_degraded_blocks",
            "Blocks recorded with fewer than R copies or off their ring nodes (awaiting repair).",
            registry=r,
        )
        self.locks_held = Gauge(
            "hafs_write_locks_held", "Write locks (one per file being changed) held.", registry=r
        )
        self.lock_wait_seconds = Histogram(
            "hafs_write_lock_wait_seconds",
            "Write locks taken, and how long taking each one waited.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.buffer_bytes = Gauge(
            "hafs_write_buffer_bytes", "Written bytes buffered, not yet stored.", registry=r
        )
        self.buffer_limit = Gauge(
            "hafs_write_buffer_limit_bytes",
            "The write buffer's size (write_buffer_mb).",
            registry=r,
        )

    def op(self, name: str):
        """The latency histogram of FUSE operation `name` (made once per name)."""
        child = self._op.get(name)
        if child is None:
            child = self._op[name] = self.op_seconds.labels(name)
        return child

    def block_call(self, node: str, call: str, seconds: float, failed: bool) -> None:
        """One block call to `node` ended (from any thread)."""
        self.block_seconds.labels(node, call).observe(seconds)
        if failed:
            self.block_errors.labels(node, call).inc()

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
